"""`lmgen batch --ray`: the same job on a Ray cluster, through Ray Data.

The driver checks the rows and skips the committed ones, as a local job does; Ray Data then maps batches of the
rest over a pool of actors, each holding one lmgen engine on --cpus-per-worker cores. An actor commits each batch
it finishes as a part named by the batch's ids (batch.part_name), so a batch retried after an actor dies writes
the same part again, and the join deduplicates by id: every id once. The driver joins the parts as a local job
does. Ray is an optional extra (`pip install 'lmgen[ray]'`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import batch


class RayMissingError(batch.BatchError):
    """--ray without Ray installed."""


class Worker:
    """One Ray Data actor: an engine on its own cores, turning batches of rows into committed parts."""

    def __init__(self, load: dict, threads: int, seed: int, max_tokens: int, slots: int, output: str):
        import torch

        from .loading import load as load_model

        torch.set_num_threads(threads)
        self.lm = load_model(**load)
        self.seed, self.max_tokens, self.slots = seed, max_tokens, slots
        self.parts = batch.Parts(Path(output))

    def __call__(self, rows: dict) -> dict:
        raw = [json.loads(r) for r in rows["row"]]
        good, errors = batch.prepare(self.lm, raw, self.seed, self.max_tokens, [int(i) for i in rows["index"]])
        records = list(batch.run_rows(self.lm, good, self.slots)) + errors
        self.parts.commit(records, batch.part_name(records))
        return {"id": [r["id"] for r in records], "tokens": [r.get("completion_tokens", 0) for r in records]}


def run(address: str | None, raw: list[dict], rows: list, parts: batch.Parts, *, load: dict, workers: int,
        cpus_per_worker: int, seed: int, max_tokens: int, slots: int, chunk_rows: int, progress) -> None:
    """Generate `rows` (batch.Row, their raw input rows in `raw`) on the Ray cluster at `address` (None: start
    one on this machine), committing parts as a local job does."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayMissingError("--ray needs Ray: pip install 'lmgen[ray]' (or pip install 'ray[data]')",
                              None) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cpus_per_worker)}})
    try:
        items = [{"row": json.dumps(raw[r.index], ensure_ascii=False), "index": r.index} for r in rows]
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its progress lines: ours is the bar
        ds = ray.data.from_items(items, override_num_blocks=max(workers, -(-len(items) // chunk_rows)))
        # Ray Data restarts a dead actor and retries its batch (max_restarts and max_task_retries default to -1).
        done = ds.map_batches(
            Worker, fn_constructor_kwargs=dict(load=load, threads=cpus_per_worker, seed=seed, max_tokens=max_tokens,
                                               slots=slots, output=str(parts.output)),
            batch_size=chunk_rows, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            batch_format="numpy")
        for out in done.iter_batches(batch_size=None, batch_format="numpy"):
            for row_id, tokens in zip(out["id"], out["tokens"]):
                progress({"id": str(row_id), "completion_tokens": int(tokens)})
    finally:
        if started:
            ray.shutdown()

