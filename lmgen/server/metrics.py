"""Prometheus text exposition of the server's and the engine's counters."""

from __future__ import annotations

import collections


def histogram_lines(name: str, help_text: str, h: dict) -> list[str]:
    """Exposition lines for a histogram snapshot from the engine ({"buckets", "counts", "sum"})."""
    out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip(h["buckets"], h["counts"]):
        running += count
        out.append(f'{name}_bucket{{le="{bound}"}} {running}')
    running += h["counts"][-1]
    return out + [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {h['sum']}", f"{name}_count {running}"]


class Metrics:
    """Request counts by endpoint and status, plus the engine's stats rendered on demand."""

    def __init__(self):
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()

    def count(self, path: str, status: int) -> None:
        """Count one finished HTTP request."""
        self.requests[(path, status)] += 1

    def render(self, stats: dict) -> str:
        """The whole /metrics page for the engine's current stats()."""
        lines = ["# HELP lmgen_http_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE lmgen_http_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'lmgen_http_requests_total{{endpoint="{path}",status="{status}"}} {n}')
        counters = [
            ("prompt_tokens", "Prompt tokens prefilled."),
            ("generated_tokens", "Tokens generated."),
            ("steps", "Engine steps run (one forward each)."),
            ("batched_steps", "Steps that ran more than one sequence."),
            ("prefix_queries", "Prompts looked up in the prefix cache."),
            ("prefix_hits", "Prompts that found a cached prefix."),
            ("prefix_hit_tokens", "Prompt tokens taken from the prefix cache instead of computed."),
            ("requests_finished", "Engine requests that ran to their end."),
            ("requests_cancelled", "Engine requests cancelled (e.g. the client left)."),
            ("requests_failed", "Engine requests that ended with an error."),
        ]
        for key, help_text in counters:
            if key in stats:
                name = f"lmgen_{key}_total"
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {stats[key]}"]
        gauges = [
            ("running", "lmgen_sequences_running", "Sequences being generated now."),
            ("waiting", "lmgen_sequences_waiting", "Sequences queued for a slot."),
            ("max_batch", "lmgen_max_batch", "The most sequences one step has run."),
            ("kv_cache_bytes", "lmgen_kv_cache_bytes",
             "Bytes reserved for the KV cache (on the CPU, taken as positions are first written)."),
        ]
        for key, name, help_text in gauges:
            if key in stats:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {stats[key]}"]
        lines += histogram_lines("lmgen_time_to_first_token_seconds", "Time from submission to the first token.",
                                 stats["ttft"])
        lines += histogram_lines("lmgen_inter_token_latency_seconds", "Time between a sequence's tokens.", stats["itl"])
        return "\n".join(lines) + "\n"
