"""`lmgen batch`: a file of prompts through the engine core, resumable, each row exactly once.

A job reads JSON lines or Parquet rows ({"id", "prompt" or "messages", and the server's sampling fields}), checks
each row with the server's own request models, and runs the good ones on one engine core (continuous batching).
Finished rows are committed in chunks, each written to a temporary file and renamed into OUTPUT.parts/: a chunk
is there whole or not at all, so a rerun after Ctrl-C, a crash or kill -9 skips the committed ids and finishes
the rest. When every row is in, the parts are joined (deduplicated by id, in input order) into OUTPUT, and the
rows that could not run into OUTPUT.errors.jsonl. A row's seed comes from sha256("{seed}:{id}"), so its text
does not depend on the batching, the worker or the rerun. batch_ray.py runs the same rows on a Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .errors import LmgenError
from .params import ParameterError
from .server.errors import from_parameter_error, from_validation_errors
from .server.output import TokenStrings, chat_logprobs
from .server.protocol import ChatCompletionRequest, CompletionRequest, template_messages

DEFAULT_MAX_TOKENS = 64
CHUNK_ROWS = 64  # rows a committed part holds (a part is also committed after CHUNK_SECONDS)
CHUNK_SECONDS = 30.0
UNSUPPORTED = ("stream", "stream_options", "tools", "tool_choice", "functions", "function_call", "echo", "suffix")


class BatchError(ValueError):
    """A job that cannot start: its input or output file (`path`) is unreadable or malformed."""

    def __init__(self, message: str, path: object):
        super().__init__(message)
        self.path = path


@dataclass
class Row:
    """One input row ready to run: its id, position, prompt ids, config and seed."""

    id: str
    index: int
    ids: list[int]
    config: object
    seed: int
    chat: bool


def row_seed(seed: int, row_id: str) -> int:
    """A row's base seed: the first 8 bytes of sha256("{seed}:{id}"), below 2**63."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big") >> 1


def read_rows(path: Path) -> list[dict]:
    """The input's rows: JSON lines (one object a line) or a Parquet file."""
    try:
        if path.suffix == ".parquet":
            return _parquet().read_table(path).to_pylist()
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        rows.append({"__error__": f"line {n} is not JSON: {e}"})
        return rows
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read {path}: {e}", path) from None
    except BatchError:
        raise
    except Exception as e:  # pyarrow's errors for a file that is not Parquet
        raise BatchError(f"cannot read {path} as Parquet: {e}", path) from None


def prepare(lm, raw: list[dict], seed: int, max_tokens: int,
            indexes: list[int] | None = None) -> tuple[list[Row], list[dict]]:
    """The rows that can run, and an error record for each that cannot (no or repeated id, bad fields); `indexes`:
    the rows' places in the input (default: their places in `raw`)."""
    rows, errors, seen = [], [], set()
    for index, data in zip(indexes or range(len(raw)), raw):
        row_id = data.get("id") if isinstance(data, dict) else None
        try:
            if not isinstance(data, dict) or "__error__" in data:
                raise ValueError(data.get("__error__") if isinstance(data, dict) else "a row must be a JSON object")
            if row_id is None or not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
                raise ValueError("the row has no id (a string or an integer)")
            row_id = str(row_id)
            if row_id in seen:
                raise ValueError(f"id {row_id!r} appears earlier in the input: only its first row runs")
            seen.add(row_id)
            rows.append(_row(lm, data, row_id, index, seed, max_tokens))
        except Exception as e:  # a row's problem, whatever it is, is that row's alone
            errors.append({"id": None if row_id is None else str(row_id), "index": index, "error": _message(e)})
    return rows, errors


def _row(lm, data: dict, row_id: str, index: int, seed: int, max_tokens: int) -> Row:
    body = {k: v for k, v in data.items() if k != "id"}
    chat = "messages" in body
    model = ChatCompletionRequest if chat else CompletionRequest
    known = {f.alias or name for name, f in model.model_fields.items()}
    unknown = sorted(k for k in body if k not in known or k in UNSUPPORTED)
    if unknown:
        raise ValueError(f"unsupported field(s) in a batch row: {', '.join(unknown)}")
    if not chat and "prompt" not in body:
        raise ValueError("the row has neither a prompt nor messages")
    request = model.model_validate(body)
    if chat:
        ids = lm.chat_ids(template_messages(request.messages))
        tokens = request.max_completion_tokens or request.max_tokens or max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        if not isinstance(request.prompt, str) and request.prompt and not isinstance(request.prompt[0], int):
            raise ValueError("a batch row has one prompt (a string or a list of token ids)")
        ids = lm.encode(request.prompt)
        tokens = max_tokens if request.max_tokens is None or "max_tokens" not in body else request.max_tokens
        logprobs = request.logprobs
    if len(ids) + tokens > lm.context_length:
        raise ValueError(f"the prompt has {len(ids)} tokens and max_tokens is {tokens}: more than the model's "
                         f"context of {lm.context_length}")
    config = request.to_generation_config(tokens, logprobs)
    lm.check_constraint(config)
    return Row(row_id, index, ids, config, config.seed if config.seed is not None else row_seed(seed, row_id), chat)


def _message(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return from_validation_errors(list(e.errors())).message
    if isinstance(e, ParameterError):
        return from_parameter_error(e).message
    return str(e) if isinstance(e, (ValueError, LmgenError)) else f"{type(e).__name__}: {e}"


def run_rows(lm, rows: Iterable[Row], slots: int = 16) -> Iterator[dict]:
    """Generate every row on one engine core, `slots` sequences at a time; a result (or error) record each, as
    each row finishes."""
    core, strings = lm.core(slots), TokenStrings(lm.tokenizer)
    pending, active = iter(rows), {}

    def feed():
        while sum(len(w.tracks) for w in core.waiting) < slots and (row := next(pending, None)) is not None:
            work = lm.work(row.ids, row.config, lm.context_length, 0, base_seed=row.seed)
            core.add(work)
            active[id(work)] = (row, work, {})

    feed()
    while core.has_work():
        events = core.step()
        for work, event in events:
            row, _, generations = active[id(work)]
            if event.error is not None:
                generations["error"] = event.error
            elif event.generation is not None:
                generations[event.index] = event.generation
        for work in {id(w): w for w, _ in events if w.finished}.values():  # whole once all its events are in
            row, _, generations = active.pop(id(work))
            if "error" in generations:
                yield {"id": row.id, "index": row.index, "error": f"generation failed: {generations['error']}"}
            else:
                yield result(row, [generations[i] for i in sorted(generations)], strings)
        feed()


def result(row: Row, gens: list, strings: TokenStrings) -> dict:
    """A row's output record: its text(s), finish reason(s), token counts and, when asked, logprobs."""
    one = len(gens) == 1
    out = {"id": row.id, "index": row.index, "text": gens[0].text if one else [g.text for g in gens],
           "finish_reason": gens[0].finish_reason if one else [g.finish_reason for g in gens],
           "prompt_tokens": len(row.ids), "completion_tokens": sum(len(g.token_ids) for g in gens)}
    if row.config.logprobs is not None and row.config.num_beams == 1:
        lps = [chat_logprobs([(lp, 0) for lp in g.logprobs or ()], strings)["content"] for g in gens]
        out["logprobs"] = lps[0] if one else lps
    return out


class Parts:
    """OUTPUT.parts/: committed chunks of records, each whole or absent; what is done; the final join."""

    def __init__(self, output: Path):
        self.output, self.dir = output, output.with_name(output.name + ".parts")
        self.errors = output.with_name(output.name + ".errors.jsonl")

    def done(self) -> dict[str, dict]:
        """The committed records by id (a finished job's output counts as committed)."""
        records: dict[str, dict] = {}
        files = sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []
        if not files and self.output.exists():
            return {r["id"]: r for r in read_rows(self.output) if "id" in r}
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                records.setdefault(record["id"], record)  # a part written twice (a retried worker): once
        return records

    def commit(self, records: list[dict], name: str) -> None:
        """Write records as part `name`: to a temporary file, synced, then renamed into place."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.dir / f"{name}.jsonl", records)

    def finish(self, order: dict[str, int], input_errors: list[dict]) -> tuple[int, int]:
        """Join the parts into OUTPUT (input order) and the errors file; remove the parts. (rows, errors)."""
        records = sorted(self.done().values(), key=lambda r: order.get(r["id"], r.get("index", 0)))
        good = [_public(r) for r in records if "error" not in r]
        bad = sorted(input_errors + [r for r in records if "error" in r], key=lambda r: r["index"])
        write_output(self.output, good)
        write_jsonl(self.errors, bad)
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()
        return len(good), len(bad)


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "index"}


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records as JSON lines atomically: a temporary file, synced, renamed over path."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_output(path: Path, records: list[dict]) -> None:
    """The final output, JSON lines or (by its suffix) Parquet, written atomically."""
    if path.suffix != ".parquet":
        return write_jsonl(path, records)
    pq = _parquet()

    columns = {k for r in records for k in r}
    for key in columns:  # a column whose rows differ in type (n > 1 beside n = 1) is stored as JSON text
        if len({type(r.get(key)) for r in records if r.get(key) is not None}) > 1 or key == "logprobs":
            for r in records:
                if r.get(key) is not None and not isinstance(r[key], str):  # (a rerun reads them back as text)
                    r[key] = json.dumps(r[key], ensure_ascii=False)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    import pyarrow

    pq.write_table(pyarrow.Table.from_pylist(records), tmp)
    os.replace(tmp, path)


def _parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise BatchError("Parquet files need pyarrow: pip install pyarrow", None) from None
    return pyarrow.parquet


def run_local(lm, rows: list[Row], parts: Parts, slots: int, progress, chunk_rows: int = CHUNK_ROWS) -> None:
    """Run rows on this process's engine, committing a part every chunk_rows rows or CHUNK_SECONDS."""
    chunk, last = [], time.monotonic()
    try:
        for record in run_rows(lm, rows, slots):
            chunk.append(record)
            progress(record)
            if len(chunk) >= chunk_rows or time.monotonic() - last > CHUNK_SECONDS:
                parts.commit(chunk, part_name(chunk))
                chunk, last = [], time.monotonic()
    finally:  # Ctrl-C or an error: the rows already finished are kept
        if chunk:
            parts.commit(chunk, part_name(chunk))


def part_name(records: list[dict]) -> str:
    """A part's file name from its ids: the same rows give the same name, on any worker or rerun."""
    return hashlib.sha256("\n".join(sorted(r["id"] for r in records)).encode()).hexdigest()[:32]
